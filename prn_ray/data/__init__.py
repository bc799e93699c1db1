"""The data path: catalog and manifests, one product's data and its budget, the stages as plain
batch functions, and the in-process runner (:mod:`.local`); :mod:`.ray_data` is the Ray Data
wiring every job shares (the only module here that imports Ray). Training's Ray Data datasets
live with the training adapters that use them (:mod:`prn_ray.train.datasets`), since they
resume from the engine's checkpoint state."""

"""The data path: catalog and manifests, one product's data and its budget, the stages as plain
batch functions, and their two runners (in-process in :mod:`.local`, Ray Data in
:mod:`.ray_training_data` on the wiring every job shares, :mod:`.ray_data`: the only modules
here that import Ray)."""

"""The data path: catalog and manifests, one product's data and its budget, the stages as plain
batch functions, and their two runners (in-process in :mod:`.local`, Ray Data in
:mod:`.ray_data`, the only module here that imports Ray)."""

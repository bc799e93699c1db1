"""The training engine, Ray-free: the trainer (step, epoch, fit), validation, selection and
calibration, checkpoints and the resume point, the normal reference and its cache, and the
same loop run in one process."""

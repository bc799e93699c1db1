"""Ray adapters for training: the Train worker, one product's driver, the fleet of products,
and hyperparameter studies with Ray Tune. The engine they drive is :mod:`prn_ray.engine`."""

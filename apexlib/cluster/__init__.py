"""Past one machine: the executors of a sweep (a local process pool or Ray tasks) and measured runs placed on
a node of the right hardware kind. Torch-free; Ray is an optional extra (``pip install .[cluster]``), imported
only when a Ray executor or a measured task is asked for."""

"""The `forcekit` command line. The library itself lives in `runtime`, `training`, `kernels`, `apps`."""

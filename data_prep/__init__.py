# Environment variables that keep numerical libraries to one thread per process: data_prep
# parallelises over processes, and the command line sets them before numpy is imported (see
# parallel.start_method: a process without native threads can fork its helpers safely).
ONE_THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

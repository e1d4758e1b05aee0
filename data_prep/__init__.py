# Environment variables that keep numerical libraries to one thread per process: data_prep
# parallelises over processes, and the command line sets them before numpy is imported (see
# parallel.start_method: a process without native threads can fork its helpers safely).
# TOKENIZERS_PARALLELISM=false: the Hugging Face tokenizers library encodes a batch on the
# calling thread instead of its own thread pool (parallel.worker_pool sets it for a run).
ONE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                  "TOKENIZERS_PARALLELISM": "false"}

"""Settings shared by benchmarks/sim_vs_real.py and its cost measurements: the deployed instances'
policy, which the simulator replays exactly."""

NUM_BLOCKS = 2048
PREFILL_BUDGET = 2048
MAX_SEQS = 128
BLOCK_SIZE = 16
VOCAB = 49152

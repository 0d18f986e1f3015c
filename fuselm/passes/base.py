"""What every pass shares: the rewrite counters tests read to prove a rule fired."""
from collections import Counter

# "<pass>.<rule>" -> number of rewrites since the last reset (like Inductor's counters).
counters: Counter = Counter()

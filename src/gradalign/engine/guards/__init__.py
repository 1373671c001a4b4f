"""What keeps a backward's statistics the ones autograd implies, or refuses them with the cause:
census.py (the graph of the first backward: every use of a parameter seen by a hook, every loss
its own sample's), inputs.py (the layer inputs the statistics read later, copied or guarded by
their version counters), static_uses.py (`ga.validate`: parameters read in another module's
forward, found in the source)."""

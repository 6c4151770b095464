"""Hardware backends behind small interfaces; the digital twin is one implementation of each."""

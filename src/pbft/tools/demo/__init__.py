"""``pbft demo``: ``live`` (a real 4-replica cluster on loopback, the default) and ``simulated``
(the narrated simulation of ``pbft demo --simulated``)."""

"""pbft: Practical Byzantine Fault Tolerance."""

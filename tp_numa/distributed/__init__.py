"""Ranks, NUMA binding and collectives (shared memory within a host, MPI across hosts)."""

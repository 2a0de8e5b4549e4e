"""tunnelnat's benchmarks: ``python -m bench.run`` (``make bench``) measures, side by side, the
gateway's NAT apply path, the per-new-connection cost, the controller's cost and the cold start.
Everything that needs the kernel runs in network namespaces named ``tn-bench-*`` that the run
creates and removes."""

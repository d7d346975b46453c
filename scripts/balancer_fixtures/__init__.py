"""One module per reference implementation of balancing strategies; see scripts/balancer_fixtures.py."""

"""The `sbora` command line: local training and evaluation now; the service's client later."""

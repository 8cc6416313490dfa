"""Example models and the demo behind `make demo`; the eptq_fx library never imports this package."""

"""The elastic controller's jobs, one module each (ports, operations, recovery, standby, sampling,
status); cluster/elastic/controller.py is the thin actor that owns them and runs the loop."""

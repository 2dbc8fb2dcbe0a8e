"""Server side: server-segment training and the run loop."""

"""`make bench`: an HTTP load generator against the real Truss server, plus a GPU roofline bench."""

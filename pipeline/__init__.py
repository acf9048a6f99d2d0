"""mrnet's pipeline: the command line, and (with Ray) encoding whole collections."""

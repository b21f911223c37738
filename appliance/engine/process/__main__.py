"""`python -m appliance.engine.process FD`: the engine process the server starts."""

from .child import main

main()

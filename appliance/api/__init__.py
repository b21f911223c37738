"""The HTTP front-ends: each translates its wire format to the engine and back."""

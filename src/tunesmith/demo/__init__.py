"""The demo task: extract a booking from a sentence into JSON with a fixed schema."""

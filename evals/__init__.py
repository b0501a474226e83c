"""`make eval`: HumanEval against any StarCoder endpoint (the local server or a Baseten deployment)."""

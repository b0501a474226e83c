"""Serving code for the StarCoder family on Truss: schemas, prompts, engine, responses.

Importable both inside the Truss image (truss puts ``packages/`` on ``sys.path``) and in tests.
"""

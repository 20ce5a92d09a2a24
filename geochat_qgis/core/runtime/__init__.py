"""Isolated model runtime: inference in a child process speaking JSON lines."""

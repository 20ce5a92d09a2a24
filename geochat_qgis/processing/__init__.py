"""The Processing provider (id ``geochat``) and its algorithms."""

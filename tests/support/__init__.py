"""Test support code: a throwaway PostgreSQL cluster and the pgmux proxy as a subprocess."""

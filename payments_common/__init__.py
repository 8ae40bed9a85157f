"""Small pieces shared by the services: settings, logging, errors, server bootstrap, tokens, keys."""

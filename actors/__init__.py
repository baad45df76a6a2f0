"""Generation side: generator workers, engine clients and servers, prompt sources, rewards."""

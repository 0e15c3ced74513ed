"""The GPU kit: wheels for a registry-less GPU machine (`prepare`) and its one-call check (`check`, `stages`)."""

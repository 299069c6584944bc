"""The application layer: the ``vcrd`` command line, the demo, the built-in synthetic task, the local
character tokenizer and the ahead-of-time kernel report."""

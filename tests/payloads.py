"""What an attacker plants in a checkpoint file: unpickling ``Payload(path)`` calls ``open(path, "w")``,
creating the file, so a test can tell whether any code ran."""


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))

"""slmforge command line (stub while building)."""
def main():
    pass

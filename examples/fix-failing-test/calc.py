"""A tiny module with a bug for the example loop to fix."""


def average(numbers):
    """The arithmetic mean of a non-empty list of numbers."""
    return sum(numbers) / (len(numbers) + 1)

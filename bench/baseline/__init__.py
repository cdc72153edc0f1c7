"""The Channels tutorial's chat consumer, the bench's point of comparison."""

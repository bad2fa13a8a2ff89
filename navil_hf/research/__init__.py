"""Research tools: parameter and FLOP accounting, scaling studies."""

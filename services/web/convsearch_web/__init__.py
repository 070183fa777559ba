"""ConvNet Search web page: a JSON API over the gateway (through the Python client) and the
static page that explores datasets, models, layers and metrics in a browser."""

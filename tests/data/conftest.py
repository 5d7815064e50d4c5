"""Markers of the data tests."""


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "multiprocess: starts grain worker processes (deselect with -m 'not multiprocess')"
  )

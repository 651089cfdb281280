"""Coverage-guided fuzz targets (atheris: libFuzzer over Python, and over the C relay when it is built
with tools/build-sanitized fuzz). See fuzz/README.md; `make fuzz`, `make fuzz-ci`."""

"""Input images for FLUX Kontext edits: reading a reference (a file, `s3://`, a URL that may not
aim at this machine), sniffing what the bytes are, listing a folder of them.

Below the request models (`models` validates a local file or data URI at construction) and above
`storage` (the one door to S3), so the contract can check its inputs without a cycle.
"""

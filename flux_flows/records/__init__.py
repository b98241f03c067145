"""What a run leaves for people and for the next job: one record per requested image, the
streamed manifest (parts, then the whole), the summary and the Prefect artifacts.
"""

"""The DICOM node (`medgemma-edge serve --dicom-port`): receives studies from a PACS or a modality
into a durable spool (config, spool, scp), prepares them in the background (studies, prepare, node)
and sends drafts back (results, outbox, audit, dicomweb). pydicom/pynetdicom/highdicom/dicomweb_client
are imported only inside these modules; the node imports the runtime, never the reverse."""

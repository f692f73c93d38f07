"""The operations layer, one module per resource behind the thin ``ims.einstein.operations.Operations`` facade."""

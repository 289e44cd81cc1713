"""The bottom layer, imported by every other package and importing none of them but kdf:
the contract between the gateway and its data planes (`common.sink`), and what every layer
shares: configuration files (`common.config`), TLS contexts (`common.tlsctx`), files that hold
secrets or state (`common.files`) and untrusted text made safe to show (`common.text`)."""

-- Admin actions and rejected keys: who did what to what, and how it went.
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    principal TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    result TEXT NOT NULL
);
CREATE INDEX audit_at ON audit (at_ms);

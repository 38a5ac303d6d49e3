"""PostgreSQL: pool, migrations, schema, bulk writer and the API's queries. All SQL lives here."""

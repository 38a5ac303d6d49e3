"""PostgreSQL: pool, migrations, schema, bulk writer and the queries behind the API. All SQL lives here."""

#!/usr/bin/env bash
# Generates every secret of the production shape (docker-compose.yml) into OUT (default
# deploy/secrets/, git-ignored): a private CA, the broker's and the gateways' TLS certificates,
# a broker password for the gateways and for each unit, the Mosquitto password file, and
# compose.env (database admin, runtime and API logins, gateway broker and Grafana passwords) to
# copy to .env; and client certificates for the senders of mutual TLS (senders/NAME.crt, .key).
#
#   deploy/make_secrets.sh [OUT]            UNITS="UMMC-FM-001 UMMC-FM-002" to name the units
#                                           SENDERS="CR-UNIT-07 LABO-CENTRAL" to name the senders
#                                           REVOKE="CR-UNIT-07" to revoke senders' certificates
#
# A sender's certificate has CN=NAME: a modality's AE title (QANTARA_DICOM_TLS_AE_FROM_CN) or a
# lab system's MSH-4.1 (QANTARA_MLLP_TLS_FACILITY_FROM_CN). The listeners trust them with
# QANTARA_{MLLP,DICOM}_TLS_CLIENT_CA=ca.crt, and refuse the revoked ones with
# QANTARA_{MLLP,DICOM}_TLS_CRL=crl.pem: the CA's revocation list, written on every run (empty
# at first), valid for ten years (OpenSSL refuses every client once it is past its next update).
# A revoked sender's files move to senders/revoked/NAME-SERIAL.*; SIGHUP to the gateways applies
# a new list. Naming a revoked sender in SENDERS again issues it a new certificate.
#
# Idempotent: what exists is kept (re-run it to add units); delete a file to regenerate it.
# Needs openssl and mosquitto_passwd (Debian package mosquitto, installed by `make system-deps`).
#
# The files are mode 0644 inside a 0700 folder: the folder keeps them from other users of this
# machine, and the containers, which run as their own users (mosquitto, uid 10001), read them
# through read-only bind mounts of each file.
set -euo pipefail

OUT=${1:-deploy/secrets}
UNITS=${UNITS:-}
SENDERS=${SENDERS:-}
REVOKE=${REVOKE:-}
GATEWAY_USER=${GATEWAY_USER:-qantara-gateway}
CERT_DAYS=${CERT_DAYS:-825}

for tool in openssl mosquitto_passwd; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "make_secrets: $tool is missing (make system-deps installs it)" >&2
    exit 1
  }
done

mkdir -p "$OUT/passwords"
chmod 700 "$OUT"
chmod 700 "$OUT/passwords"

password() {  # 32 characters of [A-Za-z0-9]
  openssl rand -base64 48 | tr -dc 'A-Za-z0-9' | head -c 32
}

if [ ! -f "$OUT/ca.crt" ]; then
  openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days 3650 \
    -subj "/CN=Qantara private CA" \
    -keyout "$OUT/ca.key" -out "$OUT/ca.crt" 2>/dev/null
  chmod 600 "$OUT/ca.key"
  echo "make_secrets: created the private CA ($OUT/ca.crt)"
fi

# issue NAME CN SUBJECT_ALT_NAMES [USAGE]: a certificate signed by the private CA, for a server
# (serverAuth, the default) or a client (clientAuth; SUBJECT_ALT_NAMES may then be empty).
issue() {
  local name=$1 cn=$2 sans=$3 usage=${4:-serverAuth}
  [ -f "$OUT/$name.crt" ] && return 0
  openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=$cn" \
    -keyout "$OUT/$name.key" -out "$OUT/$name.csr" 2>/dev/null
  {
    [ -n "$sans" ] && printf 'subjectAltName=%s\n' "$sans"
    printf 'extendedKeyUsage=%s\nkeyUsage=digitalSignature,keyEncipherment\n' "$usage"
  } >"$OUT/$name.ext"
  openssl x509 -req -sha256 -days "$CERT_DAYS" -in "$OUT/$name.csr" \
    -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
    -extfile "$OUT/$name.ext" -out "$OUT/$name.crt" 2>/dev/null
  rm -f "$OUT/$name.csr" "$OUT/$name.ext"
  chmod 644 "$OUT/$name.crt" "$OUT/$name.key"
  echo "make_secrets: issued $OUT/$name.crt (CN=$cn${sans:+, $sans}, $usage)"
}

issue broker broker "DNS:broker,DNS:localhost,IP:127.0.0.1"
issue gateway gateway "DNS:gateway-1,DNS:gateway-2,DNS:localhost,IP:127.0.0.1"
chmod 644 "$OUT/ca.crt"

# One client certificate per sender of mutual TLS, CN = its AE title or MSH-4.1.
mkdir -p "$OUT/senders"
for sender in $SENDERS; do
  if ! [[ $sender =~ ^[A-Za-z0-9_.-]{1,64}$ ]]; then
    echo "make_secrets: $sender is not a sender name (1-64 of [A-Za-z0-9_.-])" >&2
    exit 1
  fi
  issue "senders/$sender" "$sender" "" clientAuth
done

# The CA's revocation list: openssl ca's database in ca-db/, the list in crl.pem.
mkdir -p "$OUT/ca-db" "$OUT/senders/revoked"
chmod 700 "$OUT/ca-db"
[ -f "$OUT/ca-db/index.txt" ] || touch "$OUT/ca-db/index.txt"
[ -f "$OUT/ca-db/crlnumber" ] || echo 01 >"$OUT/ca-db/crlnumber"
absolute=$(cd "$OUT" && pwd)
cat >"$OUT/ca-db/openssl.cnf" <<CONF
[ ca ]
default_ca = qantara
[ qantara ]
database = $absolute/ca-db/index.txt
crlnumber = $absolute/ca-db/crlnumber
certificate = $absolute/ca.crt
private_key = $absolute/ca.key
default_md = sha256
default_crl_days = 3650
CONF
for sender in $REVOKE; do
  if [ -f "$OUT/senders/$sender.crt" ]; then
    serial=$(openssl x509 -in "$OUT/senders/$sender.crt" -noout -serial | cut -d= -f2)
    openssl ca -config "$OUT/ca-db/openssl.cnf" -revoke "$OUT/senders/$sender.crt" 2>/dev/null
    mv "$OUT/senders/$sender.crt" "$OUT/senders/revoked/$sender-$serial.crt"
    mv "$OUT/senders/$sender.key" "$OUT/senders/revoked/$sender-$serial.key"
    echo "make_secrets: revoked senders/$sender.crt (serial $serial)"
  elif ! compgen -G "$OUT/senders/revoked/$sender-*.crt" >/dev/null; then
    echo "make_secrets: no certificate senders/$sender.crt to revoke" >&2
    exit 1
  fi
done
openssl ca -config "$OUT/ca-db/openssl.cnf" -gencrl -out "$OUT/crl.pem" 2>/dev/null
chmod 644 "$OUT/crl.pem"

# One password per broker user, kept in passwords/<user> (units read theirs from there).
for user in "$GATEWAY_USER" $UNITS; do
  if ! [[ $user =~ ^[A-Za-z0-9_.-]{1,64}$ ]]; then
    echo "make_secrets: $user is not a unit id (1-64 of [A-Za-z0-9_.-])" >&2
    exit 1
  fi
  if [ ! -f "$OUT/passwords/$user" ]; then
    password >"$OUT/passwords/$user"
    chmod 600 "$OUT/passwords/$user"
    echo "make_secrets: new broker password for $user"
  fi
done

# The Mosquitto password file, rebuilt from passwords/ (salted PBKDF2 hashes only).
rm -f "$OUT/passwd.new"
touch "$OUT/passwd.new"
for file in "$OUT"/passwords/*; do
  mosquitto_passwd -b "$OUT/passwd.new" "$(basename "$file")" "$(cat "$file")"
done
chmod 644 "$OUT/passwd.new"
mv "$OUT/passwd.new" "$OUT/passwd"

if [ ! -f "$OUT/compose.env" ]; then
  umask 077
  {
    echo "# Generated by deploy/make_secrets.sh: the variables docker-compose.yml needs (see .env.example)."
    echo "COMPOSE_PROJECT_NAME=qantara"
    echo "QANTARA_MQTT_PASSWORD=$(cat "$OUT/passwords/$GATEWAY_USER")"
    echo "GRAFANA_ADMIN_PASSWORD=$(password)"
  } >"$OUT/compose.env"
  echo "make_secrets: wrote $OUT/compose.env"
fi

# Database passwords (docs/operations.md, "Database roles"): the superuser `postgres` (the one-shot
# migrate service), the runtime login `qantara` and the API's `qantara_api`. A variable missing
# from an older compose.env is added; an existing one is kept (delete its line to rotate it, then
# copy the new value into .env and run `docker compose run --rm migrate`).
for variable in QANTARA_DB_ADMIN_PASSWORD QANTARA_DB_PASSWORD QANTARA_DB_API_PASSWORD; do
  if ! grep -q "^$variable=" "$OUT/compose.env"; then
    (umask 077 && echo "$variable=$(password)" >>"$OUT/compose.env")
    echo "make_secrets: new $variable in $OUT/compose.env"
  fi
done

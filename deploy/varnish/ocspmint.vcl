# Varnish in front of `ocspmint serve` (RFC 5019 origin). The end-to-end
# tests run this exact file (tests/cdn.py); see README "Production".
#
# - The cache key is the full request URL as received: no host, no
#   normalisation, so "//" is never merged and "+", "/", "=" raw or
#   percent-encoded are distinct objects, exactly as the origin sees them.
# - TTLs come from the origin's Cache-Control (max-age ≤ nextUpdate − Date);
#   error bodies (unauthorized, malformedRequest) carry max-age=0, no-cache
#   and are never cached.
# - PURGE <url> drops one cached URL; BAN with "X-OCSP-Key: <issuer id>/<serial>"
#   drops every URL whose response carries that surrogate key (every request
#   encoding of one serial), BAN with "X-OCSP-Issuer: <issuer id>" every
#   response of one issuer. Both only from the "purgers" ACL.
# - The backend is defined in backend.vcl, found on vcl_path beside this file.
vcl 4.1;

include "backend.vcl";

acl purgers {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    if (req.method == "PURGE") {
        if (client.ip !~ purgers) {
            return (synth(405, "Not allowed"));
        }
        return (purge);
    }
    if (req.method == "BAN") {
        if (client.ip !~ purgers) {
            return (synth(405, "Not allowed"));
        }
        if (req.http.X-OCSP-Key ~ "^[0-9a-f]{40}/[0-9a-f]{40}$") {
            ban("obj.http.X-OCSP-Key == " + req.http.X-OCSP-Key);
        } elsif (req.http.X-OCSP-Issuer ~ "^[0-9a-f]{40}$") {
            ban("obj.http.X-OCSP-Key ~ ^" + req.http.X-OCSP-Issuer + "/");
        } else {
            return (synth(400, "BAN needs X-OCSP-Key or X-OCSP-Issuer"));
        }
        return (synth(200, "Banned"));
    }
    if (req.method != "GET" && req.method != "HEAD") {
        return (pass);
    }
    unset req.http.Cookie;
    unset req.http.Authorization;
    return (hash);
}

sub vcl_hash {
    hash_data(req.url);
    return (lookup);
}

sub vcl_backend_response {
    if (beresp.http.Cache-Control ~ "no-cache" || beresp.status != 200) {
        set beresp.uncacheable = true;
        set beresp.ttl = 0s;
        return (deliver);
    }
    # Serve stale never: an OCSP response past its max-age is re-fetched.
    set beresp.grace = 0s;
    set beresp.keep = 0s;
}

#!/usr/bin/env python3
"""Writes the committed seed corpora, fuzz/seeds/<target>/: the contract's examples
(tests/fixtures/contract/) and the awkward cases issue 9 names: deeply nested JSON, huge numbers,
invalid UTF-8, lone surrogates, duplicate keys, odd content types, JWTs with odd jti claims, and
AMQP content-header property lists whose headers hold every AMQP value type (encoded with the
type tags amq-protocol, and so lapin, reads; a ShortString value has none). Run: python3 fuzz/seeds.py
"""
import os, json, struct, base64
root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
con=root+'/tests/fixtures/contract/'
out=root+'/fuzz/seeds/'
def w(t,n,b):
    os.makedirs(out+t,exist_ok=True); open(out+t+'/'+n,'wb').write(b)
def dj(fields, body):
    return b''.join((f or '').encode()+b'\n' for f in fields)+body
CE='application/cloudevents+json'
TP='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'
fx=lambda n: open(con+n,'rb').read()
for k in ['tenant.created','extension.requested','tenant.token.rotate','tenant.deleted']:
    w('decode','contract-'+k,dj([k,None,None,None,None],fx(k+'.json')))
    if os.path.exists(con+k+'.cloudevents.json'):
        w('decode','contract-'+k+'-cloudevents',dj([k,CE,None,None,None],fx(k+'.cloudevents.json')))
w('decode','all-properties',dj(['tenant.created','application/json; charset=utf-8','msg-1','corr-1',TP],b'{"tenant_id":"acme-42","tenant_name":"Acme Corp","extra":{"a":[1,2,3]}}'))
c=lambda n,b: w('decode',n,dj(['tenant.created',None,None,None,None],b))
nested=lambda o,cl,d: (o*d+'"a"'+cl*d).encode()
c('nested-arrays',nested('[',']',200)); c('nested-objects',nested('{"tenant_id":','}',200)); c('unclosed-nesting',b'['*600)
c('huge-number',b'{"tenant_id":1e400,"tenant_name":18446744073709551616}')
c('long-number',('{"tenant_id":"a","n":%s}'%('9'*1200)).encode())
c('invalid-utf8',b'{"tenant_id":"acme\xff\xfe","tenant_name":"\xc3\x28"}')
c('lone-surrogate',b'{"tenant_id":"a","tenant_name":"\\ud800"}')
c('duplicate-keys',b'{"tenant_id":"first","tenant_id":"second","tenant_name":"x","tenant_name":null}')
c('nul-in-name',b'{"tenant_id":"a","tenant_name":"x\\u0000y"}')
c('not-an-object',b'["tenant_id","acme-42"]'); c('empty',b'')
# Found by fuzzing: a body that spells the start of the decoder's own message (a false leak).
c('body-spells-the-error',b'body is not valid J')
c('digits-only',b'123456789012345')
for i,ct in enumerate(["Application/JSON; charset=utf-8","text/plain","application/cloudevents-batch+json",";"," application/cloudevents+json ; charset=utf-8","application/json\0"]):
    w('decode','content-type-%d'%i,dj(['tenant.created',ct,None,None,None],fx('tenant.created.cloudevents.json')))
w('decode','cloudevent-wrong-type',dj(['tenant.deleted',CE,None,None,None],b'{"specversion":"1.0","type":"tenant.created","id":"1","data":{"tenant_id":"a"}}'))
w('decode','rotate-bad-fields',dj(['tenant.token.rotate',None,None,None,None],('{"tenant_id":"a","now":"yes","reason":"%s"}'%('r'*300)).encode()))
w('decode','unknown-key',dj(['tenant.renamed',None,None,None,None],b'{"tenant_id":"a"}'))
e=lambda b: base64.urlsafe_b64encode(b).rstrip(b'=').decode()
jwt=lambda p: '%s.%s.%s'%(e(b'{"alg":"HS256","typ":"JWT"}'),e(p),e(b'signature'))
plain=jwt(b'{"ten":"acme-corp-3f9a12c0","jti":"4f1c2e8a9b7d4c3e"}')
for n,b in [("contract-raw-jwt",(plain+"\n").encode()),("contract-json",('{"token": "%s"}'%plain).encode()),("white-space",("\r\n  %s \t\n"%plain).encode()),
 ("jti-nul",jwt(b'{"jti":"a\\u0000b"}').encode()),("jti-long",jwt(('{"jti":"%s"}'%('j'*300)).encode()).encode()),
 ("jti-huge-number",jwt(b'{"jti":1e400,"exp":18446744073709551616}').encode()),("jti-duplicate",jwt(b'{"jti":"first","jti":"last"}').encode()),
 ("jti-nested",jwt(nested('{"jti":','}',200)).encode()),("payload-invalid-utf8",jwt(b'{"jti":"\xff\xfe"}').encode()),("payload-padded",(plain+"==").encode()),
 ("payload-not-base64",b"aaa.%%%%.ccc"),("json-duplicate-token",b'{"token":"x","token":"last.one"}'),("json-token-number",b'{"token":12}'),
 ("json-nested",nested('{"token":','}',200)),("json-unclosed",b'{"token":"a.b.c"'),("invalid-utf8",b'\xff\xfea'),
 ("html-error",b"<html>502 Bad Gateway: fuzz-master-token</html>"),("empty",b""),("spaces",b"   \n")]:
    w('issuer_response',n,b)
# AMQP wire encoding (amq-protocol tags)
ss=lambda s: bytes([len(s)])+s
ls=lambda b: struct.pack('>I',len(b))+b
def val(v):
    t,x=v
    if t=='t': return b't'+bytes([x])
    if t=='b': return b'b'+struct.pack('>b',x)
    if t=='B': return b'B'+struct.pack('>B',x)
    if t=='s': return b's'+struct.pack('>h',x)
    if t=='u': return b'u'+struct.pack('>H',x)
    if t=='I': return b'I'+struct.pack('>i',x)
    if t=='i': return b'i'+struct.pack('>I',x)
    if t=='l': return b'l'+struct.pack('>q',x)
    if t=='f': return b'f'+struct.pack('>f',x)
    if t=='d': return b'd'+struct.pack('>d',x)
    if t=='D': return b'D'+struct.pack('>BI',*x)
    if t=='S': return b'S'+ls(x if isinstance(x,bytes) else x.encode())
    if t=='A': return b'A'+ls(b''.join(val(i) for i in x))
    if t=='T': return b'T'+struct.pack('>Q',x)
    if t=='F': return b'F'+table(x)
    if t=='x': return b'x'+ls(x)
    if t=='V': return b'V'
def table(entries): return ls(b''.join(ss(k.encode())+val(v) for k,v in entries))
def props(content_type=None, headers=None, message_id=None, correlation_id=None, extra=None):
    flags=0; body=b''
    fields=[(15,'content_type',content_type),(14,'content_encoding',None),(13,'headers',headers),(12,'delivery_mode',None),(11,'priority',None),(10,'correlation_id',correlation_id),(9,'reply_to',None),(8,'expiration',None),(7,'message_id',message_id),(6,'timestamp',None),(5,'type',None),(4,'user_id',None),(3,'app_id',None),(2,'cluster_id',None)]
    extra=extra or {}
    for bit,name,v in fields:
        v=extra.get(name,v)
        if v is None: continue
        flags|=1<<bit
        if name=='headers': body+=table(v)
        elif name in('delivery_mode','priority'): body+=bytes([v])
        elif name=='timestamp': body+=struct.pack('>Q',v)
        else: body+=ss(v.encode())
    return struct.pack('>H',flags)+body
def dl(key,p,b): return ss(key.encode())+p+b
S=lambda x:('S',x)
body=fx('tenant.created.json')
P=lambda h: props('application/json',h,'msg-1','corr-1')
every=[('bool',('t',1)),('i8',('b',-8)),('u8',('B',8)),('i16',('s',-16)),('u16',('u',16)),('i32',('I',-32)),('u32',('i',2**32-1)),('i64',('l',-2**63)),('f32',('f',float('nan'))),('f64',('d',-0.0)),('decimal',('D',(2,12345))),('long',S('long')),('array',('A',[S('a'),('V',None)])),('time',('T',2**64-1)),('table',('F',[('count',('l',3)),('reason',S('expired'))])),('bytes',('x',b'\x00\xff')),('void',('V',None))]
worker=[('x-tt-error',S('issuer rejected the request with HTTP 400: container name not allowed')),('x-tt-error-kind',S('rejected')),('x-tt-attempts',('l',0)),('x-tt-original-routing-key',S('tenant.created')),('x-tt-failed-at',S('2026-11-30T12:00:01.000000Z')),('x-tt-issuer-status',('l',400)),('traceparent',S(TP))]
death=[('count',('l',8)),('reason',S('delivery_limit')),('queue',S('tenant-tokens.requests')),('time',('T',1796000000)),('exchange',S('tenant.events')),('routing-keys',('A',[S('tenant.created')]))]
broker=[('x-death',('A',[('F',death)])),('x-first-death-reason',S('delivery_limit')),('x-first-death-queue',S('tenant-tokens.requests')),('x-delivery-count',('I',8))]
odd=[('x-tt-attempts',S(' 42 ')),('x-tt-issuer-status',('B',200)),('x-tt-original-routing-key',S('k'*300)),('x-tt-error',S(b'\xff\xfe\x1b')),('traceparent',('x',TP.encode()))]
everything=props('application/cloudevents+json; x='.ljust(255,'y'),every,'m','c',{'content_encoding':'gzip','delivery_mode':2,'priority':9,'reply_to':'r','expiration':'60000','timestamp':2**64-1,'type':'tenant.created','user_id':'guest','app_id':'a','cluster_id':'x'})
for n,b in [('no-properties',dl('tenant.created',struct.pack('>H',0),body)),('contract-worker-dead-letter',dl('tenant.created',P(worker),body)),('broker-dead-letter',dl('tenant-tokens.requests',P(broker),body)),('odd-header-types',dl('tenant.created',P(odd),body)),('every-amqp-type',dl('tenant.created',P(every),body)),('every-property',dl('tenant.created',everything,fx('tenant.created.cloudevents.json')))]:
    w('dead_letter_headers',n,b)
print('ok')

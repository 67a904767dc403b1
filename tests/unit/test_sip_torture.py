"""RFC 4475-style torture messages fed to a real UserAgent.

Each message is named after the RFC 4475 test it imitates.  For each we check
the exact response a UAS should give (or that nothing is sent, for stray
responses) and that no exception escapes ``receive()``.
"""

from __future__ import annotations

import re

import pytest

from gateway.sip.events import IncomingCall, MalformedMessage, Peer
from gateway.sip.message import Headers, NameAddress, SipRequest, SipResponse, Via, split_list
from gateway.sip.useragent import UserAgent

PEER = Peer("udp", "192.0.2.77", 5070)

SDP150 = (
    b"v=0\r\n"
    b"o=mhandley 29739 7272939 IN IP4 192.0.2.3\r\n"
    b"s=-\r\n"
    b"c=IN IP4 192.0.2.4\r\n"
    b"t=0 0\r\n"
    b"m=audio 49217 RTP/AVP 0 12\r\n"
    b"m=video 3227 RTP/AVP 31\r\n"
    b"a=rtpmap:31 LPC\r\n"
)

# -- valid messages (RFC 4475 3.1.1) -----------------------------------------

WSINV = (
    b"INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0\r\n"
    b"TO :\r\n"
    b" sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\r\n"
    b'from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>\r\n'
    b"  ;\r\n"
    b"  tag = 98asjd8\r\n"
    b"MaX-fOrWaRdS: 0068\r\n"
    b"Call-ID: wsinv.ndaksdj@192.0.2.1\r\n"
    b"Content-Length   : 150\r\n"
    b"cseq: 0009\r\n"
    b"  INVITE\r\n"
    b"Via  : SIP  /   2.0\r\n"
    b" /UDP\r\n"
    b"    192.0.2.2;rport;branch=390skdjuw\r\n"
    b"s :\r\n"
    b"NewFangledHeader:   newfangled value\r\n"
    b" continued newfangled value\r\n"
    b"UnknownHeaderWithUnusualValue: ;;,,;;,;\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Route:\r\n"
    b" <sip:services.example.com;lr;unknownwith=value;unknown-no-value>\r\n"
    b"v:  SIP  / 2.0  / TCP     spindle.example.com   ;\r\n"
    b"  branch  =   z9hG4bK9ikj8  ,\r\n"
    b" SIP  /    2.0   / UDP  192.168.255.111   ; branch=\r\n"
    b" z9hG4bK30239\r\n"
    b'm:"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam =\r\n'
    b"      newvalue ;\r\n"
    b"  secondparam ; q = 0.33\r\n"
    b"\r\n" + SDP150
)

INTMETH = (
    b"!interesting-Method0123456789_*+`.%indeed'~ "
    b"sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    b"@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK-.!%66*_+`'~\r\n"
    b'To: "BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f" <sip:1_unusual.URI~(to-be!sure)&isn\'t+it$/crazy?,/;;*@example.com>\r\n'
    b"From: token1~` token2'+_ token3*%!.- <sip:mundane@example.com>;"
    b"fromParam''~+*_!.-%=\xd1\x80\xd0\xb0\xd0\xb1\xd0\xbe\xd1\x82\xd0\xb0\xd1\x8e\xd1\x89\xd0\xb8\xd0\xb9"
    b";tag=_token~1'+`*%!-.\r\n"
    b"Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{\r\n"
    b"CSeq: 139122385 !interesting-Method0123456789_*+`.%indeed'~\r\n"
    b"Max-Forwards: 255\r\n"
    b"extensionHeader-!.%*+_`'~:\xef\xbb\xbf\xe5\xa4\xa7\xe5\x81\x9c\xe9\x9b\xbb\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

ESC01 = (
    b"INVITE sip:sips%3Auser%40example.com@example.net SIP/2.0\r\n"
    b"To: sip:%75se%72@example.com\r\n"
    b"From: <sip:I%20have%20spaces@example.net>;tag=938\r\n"
    b"Max-Forwards: 87\r\n"
    b"i: esc01.239409asdfakjkn23onasd0-3234\r\n"
    b"CSeq: 234234 INVITE\r\n"
    b"Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bKkdjuw\r\n"
    b"C: application/sdp\r\n"
    b"Contact:\r\n"
    b"  <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>\r\n"
    b"Content-Length: 150\r\n"
    b"\r\n" + SDP150
)

# RFC 4475 counts escnull among the *valid* messages (escaped nulls are legal
# in URIs); it is a REGISTER, which Earshot refuses with 405.
ESCNULL = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"To: sip:null-%00-null@example.com\r\n"
    b"From: sip:null-%00-null@example.com;tag=839923423\r\n"
    b"Max-Forwards: 70\r\n"
    b"Call-ID: escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd\r\n"
    b"CSeq: 14398234 REGISTER\r\n"
    b"Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bKkdjuw\r\n"
    b"Contact: <sip:%00@host5.example.com>\r\n"
    b"Contact: <sip:%00%00@host5.example.com>\r\n"
    b"L:0\r\n"
    b"\r\n"
)

ESC02 = (
    b"RE%47IST%45R sip:registrar.example.com SIP/2.0\r\n"
    b'To: "%Z%45" <sip:resource@example.com>\r\n'
    b'From: "%Z%45" <sip:resource@example.com>;tag=f232jadfj23\r\n'
    b"Call-ID: esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf\r\n"
    b"Via: SIP/2.0/TCP host.example.com;branch=z9hG4bK209%fzsnel234\r\n"
    b"CSeq: 29344 RE%47IST%45R\r\n"
    b"Max-Forwards: 70\r\n"
    b"Contact: <sip:alias1@host1.example.com>\r\n"
    b"C%6Fntact: <sip:alias2@host2.example.com>\r\n"
    b"Contact: <sip:alias3@host3.example.com>\r\n"
    b"l: 0\r\n"
    b"\r\n"
)

LWSDISP = (
    b"OPTIONS sip:user@example.com SIP/2.0\r\n"
    b"To: sip:user@example.com\r\n"
    b"From: caller<sip:caller@example.com>;tag=323\r\n"
    b"Max-Forwards: 70\r\n"
    b"Call-ID: lwsdisp.1234abcd@funky.example.com\r\n"
    b"CSeq: 60 OPTIONS\r\n"
    b"Via: SIP/2.0/UDP funky.example.com;branch=z9hG4bKkdjuw\r\n"
    b"l: 0\r\n"
    b"\r\n"
)

LONGREQ = (
    b"INVITE sip:user@example.com SIP/2.0\r\n"
    b'To: "I have a user name of ' + b"extreme " * 20 + b'proportion"<sip:user@example.com:6000;'
    b"unknownparam1=very" + b"long" * 20 + b"value;longparam" + b"name" * 25 + b"=shortvalue;"
    b"very" + b"long" * 25 + b"ParameterNameWithNoValue>\r\n"
    b"F: sip:" + b"amazinglylongcallername" * 5 + b"@example.net;tag=12" + b"982" * 50 + b"424;"
    b"unknownheaderparam" + b"name" * 20 + b"=unknowheaderparamvalue" + b"value" * 15 + b";"
    b"unknownValuelessparamname" + b"name" * 10 + b"\r\n"
    b"Call-ID: longreq.one" + b"really" * 20 + b"longcallid\r\n"
    b"CSeq: 3882340 INVITE\r\n"
    b"Unknown-" + b"Long" * 20 + b"-Name: unknown-" + b"long" * 20 + b"-value; unknown-" + b"long" * 20 + b"-parameter-name"
    b" = unknown-" + b"long" * 20 + b"-parameter-value\r\n"
    + b"".join(
        b"Via: SIP/2.0/TCP sip33.example.com;branch=z9hG4bKlong%d\r\n" % i for i in range(34)
    )
    + b"Via: SIP/2.0/TCP host" + b"x" * 50 + b".example.net;branch=z9hG4bK23" + b"4" * 50 + b"\r\n"
    b"Max-Forwards: 70\r\n"
    b"Contact: <sip:" + b"amazinglylongcallername" * 5 + b"@host5.example.net>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"l: 150\r\n"
    b"\r\n" + SDP150
)

DBLREQ = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"To: sip:j.user@example.com\r\n"
    b"From: sip:j.user@example.com;tag=43251j3j324\r\n"
    b"Max-Forwards: 8\r\n"
    b"I: dblreq.0ha0isndaksdj99sdfafnl3lk233412\r\n"
    b"Contact: sip:j.user@host.example.com\r\n"
    b"CSeq: 8 REGISTER\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.125;branch=z9hG4bKkdjuw23492\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
    b"INVITE sip:joe@example.com SIP/2.0\r\n"
    b"t: sip:joe@example.com\r\n"
    b"From: sip:caller@example.net;tag=141334\r\n"
    b"Max-Forwards: 8\r\n"
    b"Call-ID: dblreq.0ha0isnda977644900765@192.0.2.15\r\n"
    b"CSeq: 8 INVITE\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw380234\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 150\r\n"
    b"\r\n" + SDP150
)

SEMIURI = (
    b"OPTIONS sip:user;par=u%40example.net@example.com SIP/2.0\r\n"
    b"To: sip:j_user@example.com\r\n"
    b"From: sip:caller@example.org;tag=33242\r\n"
    b"Max-Forwards: 3\r\n"
    b"Call-ID: semiuri.0ha0isndaksdj\r\n"
    b"CSeq: 8 OPTIONS\r\n"
    b"Accept: application/sdp, application/pkcs7-mime,\r\n"
    b"        multipart/mixed, multipart/signed,\r\n"
    b"        message/sip, message/sipfrag\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKkdjuw\r\n"
    b"l: 0\r\n"
    b"\r\n"
)

TRANSPORTS = (
    b"OPTIONS sip:user@example.com SIP/2.0\r\n"
    b"To: sip:user@example.com\r\n"
    b"From: <sip:caller@example.com>;tag=323\r\n"
    b"Max-Forwards: 70\r\n"
    b"Call-ID:  transports.kijh4akdnaqjkwendsasfdj\r\n"
    b"Accept: application/sdp\r\n"
    b"CSeq: 60 OPTIONS\r\n"
    b"Via: SIP/2.0/UDP t1.example.com;branch=z9hG4bKkdjuw\r\n"
    b"Via: SIP/2.0/SCTP t2.example.com;branch=z9hG4bKklasjdhf\r\n"
    b"Via: SIP/2.0/TLS t3.example.com;branch=z9hG4bK2980unddj\r\n"
    b"Via: SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKasd0f3en\r\n"
    b"Via: SIP/2.0/TCP t5.example.com;branch=z9hG4bK0a9idfnee\r\n"
    b"l: 0\r\n"
    b"\r\n"
)

MPART_SDP = (
    b"v=0\r\n"
    b"o=username 0 0 IN IP4 192.0.2.128\r\n"
    b"s=-\r\n"
    b"c=IN IP4 192.0.2.128\r\n"
    b"t=0 0\r\n"
    b"m=audio 1234 RTP/AVP 0\r\n"
)
MPART_BODY = (
    b"--7a9cbec02ceef655\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Transfer-Encoding: binary\r\n"
    b"\r\n" + MPART_SDP + b"\r\n"
    b"--7a9cbec02ceef655\r\n"
    b"Content-Type: image/gif\r\n"
    b"Content-Transfer-Encoding: binary\r\n"
    b"Content-Disposition: icon\r\n"
    b"\r\n"
    b"GIF89a\x01\x00\x01\x00\x00\xff\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x00;\r\n"
    b"--7a9cbec02ceef655--\r\n"
)
MPART01 = (
    b"INVITE sip:kumiko@example.org SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK3d3B2\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: \"Bob\" <sip:bob@example.org>;tag=9z2A\r\n"
    b"To: <sip:kumiko@example.org>\r\n"
    b"Call-ID: mpart01.1122aa@example.org\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:bob@192.0.2.1>\r\n"
    b"Content-Type: multipart/mixed;boundary=7a9cbec02ceef655\r\n"
    b"Content-Length: 347\r\n"
    b"\r\n" + MPART_BODY
)

UNREASON = (
    "SIP/2.0 200 = 2**3 * 5**2 но сто девяносто девять - простое\r\n".encode()
    + b"Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923\r\n"
    b"Call-ID: unreason.1234ksdfak3j2erwedfsASdf\r\n"
    b"CSeq: 35 INVITE\r\n"
    b"From: sip:user@example.com;tag=11141343\r\n"
    b"To: sip:user@example.edu;tag=2229\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

NOREASON = (
    b"SIP/2.0 100 \r\n"
    b"Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe\r\n"
    b"Call-ID: noreason.asndj203insdf99223ndf\r\n"
    b"CSeq: 35 INVITE\r\n"
    b"From: <sip:user@example.com>;tag=39ansfi3\r\n"
    b"To: <sip:user@example.edu>;tag=902jndnke3\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

INV2543 = (
    b"INVITE sip:UserB@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP iftgw.example.com\r\n"
    b"From: <sip:+13035551111@ift.client.example.net;user=phone>\r\n"
    b"Record-Route: <sip:UserB@example.com;maddr=ss1.example.com>\r\n"
    b"To: sip:+16505552222@ss1.example.net;user=phone\r\n"
    b"Call-ID: inv2543.1717@ift.client.example.com\r\n"
    b"CSeq: 56 INVITE\r\n"
    b"Content-Type: application/sdp\r\n"
    b"\r\n" + SDP150
)

BADDATE = (
    b"INVITE sip:user@example.com SIP/2.0\r\n"
    b"To: sip:user@example.com\r\n"
    b"From: sip:caller@example.net;tag=2234923\r\n"
    b"Max-Forwards: 70\r\n"
    b"Call-ID: baddate.239423mnsadf3j23lj42--sedfnm234\r\n"
    b"CSeq: 1392934 INVITE\r\n"
    b"Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKkdjuw\r\n"
    b"Date: Fri, 01 Jan 2010 16:00:00 EST\r\n"
    b"Contact: <sip:caller@host5.example.net>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 150\r\n"
    b"\r\n" + SDP150
)

# -- invalid messages (RFC 4475 3.1.2 and 3.3) --------------------------------

BADINV01 = (
    b"INVITE sip:user@example.com SIP/2.0\r\n"
    b"To: sip:j.user@example.com\r\n"
    b"From: sip:caller@example.net;tag=134161461246\r\n"
    b"Max-Forwards: 7\r\n"
    b"Call-ID: badinv01.0ha0isndaksdjasdf3234nas\r\n"
    b"CSeq: 8 INVITE\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.15;;,;,,\r\n"
    b'Contact: "Joe" <sip:joe@example.org>;;;;\r\n'
    b"Content-Length: 150\r\n"
    b"Content-Type: application/sdp\r\n"
    b"\r\n" + SDP150
)

CLERR = (
    b"INVITE sip:user@example.com SIP/2.0\r\n"
    b"Max-Forwards: 80\r\n"
    b"To: sip:j.user@example.com\r\n"
    b"From: sip:caller@example.net;tag=93942939o2\r\n"
    b"Contact: <sip:caller@hungry.example.net>\r\n"
    b"Call-ID: clerr.0ha0isndaksdjweiafasdk3\r\n"
    b"CSeq: 8 INVITE\r\n"
    b"Via: SIP/2.0/UDP host5.example.com;branch=z9hG4bK-39234-23523\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 9999\r\n"
    b"\r\n" + SDP150
)

SCALAR02 = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bK342sdfoi3\r\n"
    b"To: <sip:user@example.com>\r\n"
    b"From: <sip:user@example.com>;tag=239232jh3\r\n"
    b"CSeq: 36893488147419103232 REGISTER\r\n"
    b"Call-ID: scalar02.23o0pd9vanlq3wnrlnewofjas9ui32\r\n"
    b"Max-Forwards: 300\r\n"
    b"Expires: 1" + b"0" * 100 + b"\r\n"
    b"Contact: <sip:user@host129.example.com>\r\n"
    b"  ;expires=280297596632815\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

SCALARLG = (
    b"SIP/2.0 503 Service Unavailable\r\n"
    b"Via: SIP/2.0/TCP host129.example.com;branch=z9hG4bKzzxdiwo34sw;received=192.0.2.129\r\n"
    b"To: <sip:user@example.com>\r\n"
    b"From: <sip:other@example.net>;tag=2easdjfejw\r\n"
    b"CSeq: 9292394834772304023312 OPTIONS\r\n"
    b"Call-ID: scalarlg.noase0of0234hn2qofoaf0232aewf2394r\r\n"
    b"Retry-After: 949302838503028349304023988\r\n"
    b"Warning: 1812 overture \"In Progress\"\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

QUOTBAL = (
    b"INVITE sip:user@example.com SIP/2.0\r\n"
    b'To: "Mr. J. User <sip:j.user@example.com>\r\n'
    b'From: "Bell, Alexander" <sip:a.g.bell@example.com>;tag=43\r\n'
    b"Max-Forwards: 70\r\n"
    b"Call-ID: quotbal.aksdj\r\n"
    b"Contact: <sip:a.g.bell@kings.example.com>\r\n"
    b"CSeq: 8 INVITE\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.59:5050;branch=z9hG4bKkdjuw39234\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 150\r\n"
    b"\r\n" + SDP150
)

LTGTRURI = (
    b"INVITE <sip:user@example.com> SIP/2.0\r\n"
    b"To: sip:user@example.com\r\n"
    b"From: sip:caller@example.net;tag=39291\r\n"
    b"Max-Forwards: 23\r\n"
    b"Call-ID: ltgtruri.1@192.0.2.5\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.5\r\n"
    b"Contact: <sip:caller@host5.example.net>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 150\r\n"
    b"\r\n" + SDP150
)

LWSRURI = LTGTRURI.replace(b"INVITE <sip:user@example.com> SIP/2.0", b"INVITE sip:user@example.com; lr SIP/2.0").replace(
    b"ltgtruri", b"lwsruri"
)
LWSSTART = LTGTRURI.replace(b"INVITE <sip:user@example.com> SIP/2.0", b"INVITE  sip:user@example.com  SIP/2.0").replace(
    b"ltgtruri", b"lwsstart"
)

TRWS = (
    b"OPTIONS sip:remote-target@example.com SIP/2.0  \r\n"
    b"Via: SIP/2.0/TCP host1.example.com;branch=z9hG4bK299342093\r\n"
    b"To: <sip:remote-target@example.com>\r\n"
    b"From: <sip:local-resource@example.com>;tag=329429089\r\n"
    b"Call-ID: trws.oicu34958239neffasdhr2345r\r\n"
    b"Accept: application/sdp\r\n"
    b"CSeq: 238923 OPTIONS\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

MCL01 = (
    b"OPTIONS sip:user@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bK293423\r\n"
    b"To: sip:user@example.com\r\n"
    b"From: sip:other@example.net;tag=3923942\r\n"
    b"Call-ID: mcl01.fhn2323orihawfdoa3o4r52o3irsdf\r\n"
    b"CSeq: 15932 OPTIONS\r\n"
    b"Content-Length: 13\r\n"
    b"Max-Forwards: 60\r\n"
    b"Content-Length: 5\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"There's no way to know how many octets are supposed to be here.\r\n"
)

BCAST = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923\r\n"
    b"Via: SIP/2.0/UDP 255.255.255.255;branch=z9hG4bK1saber23\r\n"
    b"Call-ID: bcast.0384840201234ksdfak3j2erwedfsASdf\r\n"
    b"CSeq: 35 INVITE\r\n"
    b"From: sip:user@example.com;tag=11141343\r\n"
    b"To: sip:user@example.edu;tag=2229\r\n"
    b"Content-Length: 154\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Contact: <sip:user@host28.example.com>\r\n"
    b"\r\n" + SDP150 + b"\r\n\r\n"
)

BEXT01 = (
    b"OPTIONS sip:user@example.com SIP/2.0\r\n"
    b"To: sip:j_user@example.com\r\n"
    b"From: sip:caller@example.net;tag=242etr\r\n"
    b"Max-Forwards: 6\r\n"
    b"Call-ID: bext01.0ha0isndaksdj\r\n"
    b"Require: nothingSupportsThis, nothingSupportsThisEither\r\n"
    b"Proxy-Require: noProxiesSupportThis, norDoAnyProxiesSupportThis\r\n"
    b"CSeq: 8 OPTIONS\r\n"
    b"Via: SIP/2.0/TLS fold-and-staple.example.com;branch=z9hG4bKkdjuw\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

CPARAM01 = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP saturn.example.com:5060;branch=z9hG4bKkdjuw\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: sip:watson@example.com;tag=DkfVgjkrtMwaerKKpe\r\n"
    b"To: sip:watson@example.com\r\n"
    b"Call-ID: cparam01.70710@saturn.example.com\r\n"
    b"CSeq: 2 REGISTER\r\n"
    b"Contact: sip:+19725552222@gw1.example.net;unknownparam\r\n"
    b"l: 0\r\n"
    b"\r\n"
)

REGAUT01 = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"To: sip:j.user@example.com\r\n"
    b"From: sip:j.user@example.com;tag=87321hj23128\r\n"
    b"Max-Forwards: 8\r\n"
    b"Call-ID: regaut01.0ha0isndaksdj\r\n"
    b"CSeq: 9338 REGISTER\r\n"
    b"Via: SIP/2.0/TCP 192.0.2.253;branch=z9hG4bKkdjuw\r\n"
    b"Authorization: NoOneKnowsThisScheme opaque-data=here\r\n"
    b"Content-Length:0\r\n"
    b"\r\n"
)

SDP01 = (
    b"INVITE sip:user@example.com SIP/2.0\r\n"
    b"To: sip:j_user@example.com\r\n"
    b"Contact: <sip:caller@host15.example.net>\r\n"
    b"From: sip:caller@example.net;tag=234\r\n"
    b"Max-Forwards: 5\r\n"
    b"Call-ID: sdp01.ndaksdj9342dasdd\r\n"
    b"Accept: text/nobodyKnowsThis\r\n"
    b"CSeq: 8 INVITE\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bKkdjuw\r\n"
    b"Content-Length: 150\r\n"
    b"Content-Type: application/sdp\r\n"
    b"\r\n" + SDP150
)

ZEROMF = (
    b"OPTIONS sip:user@example.com SIP/2.0\r\n"
    b"To: sip:user@example.com\r\n"
    b"From: sip:caller@example.net;tag=3ew0ssd\r\n"
    b"Max-Forwards: 0\r\n"
    b"Call-ID: zeromf.2d4e9kfn4i4u8e9k\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Via: SIP/2.0/UDP host5.example.net;branch=z9hG4bKdx3e1\r\n"
    b"l: 0\r\n"
    b"\r\n"
)

INSUF = (
    b"INVITE sip:user@example.com SIP/2.0\r\n"
    b"CSeq: 193942 INVITE\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.95;branch=z9hG4bKkdj.insuf\r\n"
    b"Content-Type: application/sdp\r\n"
    b"l: 150\r\n"
    b"\r\n" + SDP150
)

BADVERS = (
    b"OPTIONS sip:t.watson@example.org SIP/7.0\r\n"
    b"Via:     SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw\r\n"
    b"Max-Forwards:     70\r\n"
    b"From:    A. Bell <sip:a.g.bell@example.com>;tag=qweoiqpe\r\n"
    b"To:      T. Watson <sip:t.watson@example.org>\r\n"
    b"Call-ID: badvers.31417@c.example.com\r\n"
    b"CSeq:    1 OPTIONS\r\n"
    b"l: 0\r\n"
    b"\r\n"
)

MISMATCH01 = (
    b"OPTIONS sip:user@example.com SIP/2.0\r\n"
    b"To: sip:j.user@example.com\r\n"
    b"From: sip:caller@example.net;tag=34525\r\n"
    b"Max-Forwards: 6\r\n"
    b"Call-ID: mismatch01.dj0234sxdfl3\r\n"
    b"CSeq: 8 INVITE\r\n"
    b"Via: SIP/2.0/UDP host.example.com;branch=z9hG4bKkdjuw\r\n"
    b"l: 0\r\n"
    b"\r\n"
)

MISMATCH02 = MISMATCH01.replace(b"OPTIONS sip", b"NEWMETHOD sip").replace(b"mismatch01", b"mismatch02")

BIGCODE = (
    b"SIP/2.0 4294967301 better not break the receiver\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2398ndaoe\r\n"
    b"Call-ID: bigcode.asdof3uj203asdnf3429uasdhfas3ehjasdfas9i\r\n"
    b"CSeq: 353494 INVITE\r\n"
    b"From: <sip:user@example.com>;tag=39ansfi3\r\n"
    b"To: <sip:user@example.edu>;tag=902jndnke3\r\n"
    b"Content-Length: 0\r\n"
    b"Contact: <sip:user@host105.example.com>\r\n"
    b"\r\n"
)

BADASPEC = (
    b"OPTIONS sip:user@example.org SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP host4.example.com:5060;branch=z9hG4bKkdju43234\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Bell, Alexander" <sip:a.g.bell@example.com>;tag=433423\r\n'
    b'To: "Watson, Thomas" < sip:t.watson@example.org >\r\n'
    b"Call-ID: badaspec.sdf0234n2nds0a099u23h3hnnw009cdkne3\r\n"
    b"Accept: application/sdp\r\n"
    b"CSeq: 3923239 OPTIONS\r\n"
    b"l: 0\r\n"
    b"\r\n"
)

BADDN = (
    b"OPTIONS sip:t.watson@example.org SIP/2.0\r\n"
    b"Via:     SIP/2.0/UDP c.example.com:5060;branch=z9hG4bKkdjuw\r\n"
    b"Max-Forwards:      70\r\n"
    b"From:    Bell, Alexander <sip:a.g.bell@example.com>;tag=43\r\n"
    b"To:      Watson, Thomas <sip:t.watson@example.org>\r\n"
    b"Call-ID: baddn.31415@c.example.com\r\n"
    b"Accept: application/sdp\r\n"
    b"CSeq:    3923239 OPTIONS\r\n"
    b"l: 0\r\n"
    b"\r\n"
)

NCL = (
    b"INVITE sip:user@example.com SIP/2.0\r\n"
    b"Max-Forwards: 254\r\n"
    b"To: sip:j.user@example.com\r\n"
    b"From: sip:caller@example.net;tag=32394234\r\n"
    b"Call-ID: ncl.0ha0isndaksdj2193423r542w35\r\n"
    b"CSeq: 0 INVITE\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.53;branch=z9hG4bKkdjuw\r\n"
    b"Contact: <sip:caller@example53.example.net>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: -999\r\n"
    b"\r\n" + SDP150
)

UNKSCM = (
    b"OPTIONS nobodyKnowsThisScheme:totallyopaquecontent SIP/2.0\r\n"
    b"To: sip:user@example.com\r\n"
    b"From: sip:caller@example.net;tag=384\r\n"
    b"Max-Forwards: 3\r\n"
    b"Call-ID: unkscm.nasdfasser0q239nwsdfasdkl34\r\n"
    b"CSeq: 3923423 OPTIONS\r\n"
    b"Via: SIP/2.0/TCP host9.example.com;branch=z9hG4bKkdjuw39234\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

CALL = "call"  # expected outcome: 100 Trying + IncomingCall
NOTHING = "nothing"  # expected outcome: no transmission at all

CASES: dict[str, tuple[bytes, object, str | None]] = {
    # valid
    "wsinv": (WSINV, 481, None),  # To tag we never issued
    "intmeth": (INTMETH, 501, None),
    "esc01": (ESC01, CALL, None),
    "escnull": (ESCNULL, 405, None),
    "esc02": (ESC02, 501, None),
    "lwsdisp": (LWSDISP, 200, None),
    "longreq": (LONGREQ, CALL, None),
    "dblreq": (DBLREQ, 405, None),
    "semiuri": (SEMIURI, 200, None),
    "transports": (TRANSPORTS, 200, None),
    "mpart01": (MPART01, CALL, None),
    "unreason": (UNREASON, NOTHING, None),
    "noreason": (NOREASON, NOTHING, None),
    "inv2543": (INV2543, CALL, None),
    "baddate": (BADDATE, CALL, None),  # a Date we do not use is no reason to refuse a call
    # invalid
    "badinv01": (BADINV01, 400, "Bad Request - Malformed Via"),
    "clerr": (CLERR, 400, "Bad Request - Content-Length mismatch"),
    "scalar02": (SCALAR02, 400, "Bad Request - CSeq number out of range"),
    "scalarlg": (SCALARLG, NOTHING, None),
    "quotbal": (QUOTBAL, 400, "Bad Request - Unterminated quoted string in To"),
    "ltgtruri": (LTGTRURI, 400, "Bad Request - Malformed Request-URI"),
    "lwsruri": (LWSRURI, 400, "Bad Request - Malformed Request-Line"),
    "lwsstart": (LWSSTART, 400, "Bad Request - Malformed Request-Line"),
    "trws": (TRWS, 400, "Bad Request - Malformed Request-Line"),
    "mcl01": (MCL01, 400, "Bad Request - Multiple Content-Length"),
    "bcast": (BCAST, NOTHING, None),
    "bext01": (BEXT01, 420, None),
    "cparam01": (CPARAM01, 405, None),
    "regaut01": (REGAUT01, 405, None),
    "sdp01": (SDP01, 406, None),
    "zeromf": (ZEROMF, 483, None),
    "insuf": (INSUF, 400, "Bad Request - Missing Call-ID"),
    "badvers": (BADVERS, 505, "Version Not Supported"),
    "mismatch01": (MISMATCH01, 400, "Bad Request - CSeq method mismatch"),
    "mismatch02": (MISMATCH02, 400, "Bad Request - CSeq method mismatch"),
    "bigcode": (BIGCODE, NOTHING, None),
    "badaspec": (BADASPEC, 400, "Bad Request - Malformed To"),
    "baddn": (BADDN, 400, "Bad Request - Malformed From"),
    "ncl": (NCL, 400, "Bad Request - Invalid Content-Length"),
    "unkscm": (UNKSCM, 416, None),
}


def _loose(data: bytes) -> SipResponse:
    """Read a response without validating it: a 400 echoes the very header
    that was broken (RFC 3261 8.2.6.2 copies Via, From, To, Call-ID, CSeq)."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "surrogateescape").split("\r\n")
    version, status, reason = lines[0].split(" ", 2)
    assert version == "SIP/2.0"
    headers = Headers()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        assert colon and name == name.strip(), line
        headers.add(name, value.strip())
    return SipResponse(int(status), reason, headers, body)


def _responses(ua: UserAgent) -> list[SipResponse]:
    out = []
    for t in ua.take_transmits():
        assert t.peer == PEER  # symmetric response routing
        out.append(_loose(t.data))
    return out


def _request_vias(data: bytes) -> list[str]:
    """The request's Via values, unfolded but not validated."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "surrogateescape")
    head = re.sub(r"[ \t]*\r\n[ \t]+", " ", head)
    vias: list[str] = []
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() in ("via", "v"):
            vias.extend(split_list(value.strip()))
    return vias


@pytest.mark.parametrize("name", list(CASES))
def test_torture_message(name: str) -> None:
    data, expected, reason = CASES[name]
    ua = UserAgent(local_host="192.0.2.200", local_port=5060)
    ua.receive(data, PEER, 0.0)  # must not raise
    responses = _responses(ua)
    events = ua.take_events()
    if expected == NOTHING:
        assert responses == []
        assert all(isinstance(e, MalformedMessage) for e in events)
        return
    if expected == CALL:
        assert [r.status for r in responses] == [100]
        assert len(events) == 1 and isinstance(events[0], IncomingCall)
        return
    assert [r.status for r in responses] == [expected]
    resp = responses[0]
    if reason is not None:
        assert resp.reason == reason
    # The client can match the response: all Vias (the top one stamped with
    # received/rport), Call-ID and CSeq are echoed.
    request_vias = _request_vias(data)
    response_vias = resp.headers.get_all("via")
    assert response_vias[1:] == request_vias[1:]
    try:
        sent = Via.parse(request_vias[0])
    except ValueError:
        assert response_vias[0] == request_vias[0]  # unparsable: echoed untouched
    else:
        stamped = Via.parse(response_vias[0])
        assert (stamped.host, stamped.port, stamped.branch) == (sent.host, sent.port, sent.branch)
        assert stamped.received == PEER.host
        assert stamped.params.get("rport") == (str(PEER.port) if sent.rport else None)
    request = data.split(b"\r\n\r\n", 1)[0]
    for name in ("call-id", "cseq"):
        value = resp.headers.get(name)
        assert value is None or value.encode("utf-8", "surrogateescape") in request.replace(b"\r\n  ", b" ")
    # Final responses outside a dialog carry a To tag.
    to = resp.headers.get("to")
    if to is not None and expected != 400:
        assert NameAddress.parse(to).tag
    if expected in (400, 505):
        assert [e.reason for e in events if isinstance(e, MalformedMessage)] == [resp.reason]
    else:
        assert events == []


def test_specific_details() -> None:
    ua = UserAgent(local_host="192.0.2.200", local_port=5060)
    # bext01: 420 lists exactly the unknown option tags; Proxy-Require is not ours to judge.
    ua.receive(BEXT01, PEER, 0.0)
    (resp,) = _responses(ua)
    assert resp.headers.get_all("unsupported") == ["nothingSupportsThis", "nothingSupportsThisEither"]
    # REGISTER: 405 with Allow.
    ua.receive(CPARAM01, PEER, 0.0)
    (resp,) = _responses(ua)
    assert "INVITE" in resp.headers.get_all("allow") and "REGISTER" not in resp.headers.get_all("allow")
    # mpart01: the offer handed to the application is the SDP part only.
    ua.receive(MPART01, PEER, 0.0)
    _responses(ua)
    (event,) = ua.take_events()
    assert isinstance(event, IncomingCall) and event.offer == MPART_SDP
    # wsinv: the top Via gets received and rport (RFC 3581) and the rest is untouched.
    ua.receive(WSINV, PEER, 0.0)
    (resp,) = _responses(ua)
    top = Via.parse(resp.headers.get("via") or "")
    assert (top.received, top.params["rport"], top.branch) == ("192.0.2.77", "5070", "390skdjuw")
    # dblreq: the INVITE hiding after the REGISTER's empty body is ignored on UDP.
    ua.receive(DBLREQ, PEER, 0.0)
    assert [r.status for r in _responses(ua)] == [405]
    assert ua.take_events() == []
    # intmeth: odd bytes are echoed back unchanged in From/To/Call-ID.
    ua.receive(INTMETH, PEER, 0.0)
    (t,) = ua.take_transmits()
    assert b"Call-ID: intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{\r\n" in t.data
    assert b'To: "BEL:\\\x07 NUL:\\\x00 DEL:\\\x7f" <sip:' in t.data


def test_rfc2543_retransmission_matched_without_branch() -> None:
    ua = UserAgent(local_host="192.0.2.200", local_port=5060)
    ua.receive(INV2543, PEER, 0.0)
    assert [r.status for r in _responses(ua)] == [100]
    (event,) = ua.take_events()
    assert isinstance(event, IncomingCall) and isinstance(event.request, SipRequest)
    ua.receive(INV2543, PEER, 0.5)  # retransmission: absorbed, 100 resent
    assert [r.status for r in _responses(ua)] == [100]
    assert ua.take_events() == []
    ua.reject(event.dialog_id, 486, now=1.0)
    (busy,) = _responses(ua)
    assert busy.status == 486
    # RFC 2543 ACK for the 486: same Request-URI, Call-ID, CSeq number, top Via.
    ack = (
        INV2543.split(b"\r\n\r\n")[0].replace(b"INVITE sip", b"ACK sip").replace(b"56 INVITE", b"56 ACK")
        .replace(b"Content-Type: application/sdp\r\n", b"")
        .replace(b"To: sip:+16505552222@ss1.example.net;user=phone", b"To: " + (busy.headers.get("to") or "").encode())
        + b"\r\nContent-Length: 0\r\n\r\n"
    )
    ua.receive(ack, PEER, 1.1)
    ua.handle_timers(10.0)  # Timer G would have resent the 486 by now without that ACK
    assert ua.take_transmits() == []
